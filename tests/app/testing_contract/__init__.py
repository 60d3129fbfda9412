"""The contract of the relay tests' throwaway "testing" module: found by the contract loader."""
