"""Events of the relay tests' "testing" module that no subscription names."""

from app.messages import Event


class Counted(Event, tag="testing.Counted"):
    """No subscribers."""

    key: str
