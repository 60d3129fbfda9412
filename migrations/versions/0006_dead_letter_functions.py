"""Dead letters operated by SQL, and compensation recorded on the letter.

`switchboard_dlq_replay(ids, actor)` and `switchboard_dlq_discard(ids, actor)` are the one
implementation of replay and discard: the CLI and the admin API call them through
app/relay/dead_letters.py, and an operator in psql calls them directly. Each takes the letters
that are still parked among `ids` (anything else is left alone), changes them, their outbox rows
and the rows parked behind them in one statement, writes the history, wakes the relays with a
NOTIFY on the outbox channel (app/db.py OUTBOX_CHANNEL) and returns the ids it changed. The
single-id overloads are for typing by hand: `select switchboard_dlq_replay(42)`.

`dead_letters.compensation` says what the subscription's `on_dead_letter` did in the transaction
that parked the row: NULL when it declares none, 'compensated', or 'compensation failed: <error>'.

Revision ID: 0006
Revises: 0005
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# The body shared by replay and discard: {action} is the letter's new status, {outbox} what
# happens to its own outbox row. Parameters are qualified by the function's name: `actor` is
# also a column of dead_letter_history.
RESOLVE = """
CREATE FUNCTION switchboard_dlq_{verb}(ids bigint[], actor text DEFAULT 'sql:' || current_user)
RETURNS SETOF bigint LANGUAGE plpgsql AS $fn$
DECLARE
    done bigint[];
BEGIN
    WITH letter AS (
        UPDATE dead_letters SET status = '{action}', resolved_at = now(), resolved_by = switchboard_dlq_{verb}.actor
        WHERE id = ANY(switchboard_dlq_{verb}.ids) AND status = 'parked'
        RETURNING id, outbox_id
    ), own AS (
        {outbox}
    ), released AS (
        UPDATE outbox o SET status = 'pending', blocked_by = NULL FROM letter WHERE o.blocked_by = letter.id
    ), history AS (
        INSERT INTO dead_letter_history (dead_letter_id, action, actor)
        SELECT letter.id, '{action}', switchboard_dlq_{verb}.actor FROM letter
    )
    SELECT coalesce(array_agg(letter.id ORDER BY letter.id), '{{}}') INTO done FROM letter;
    IF cardinality(done) > 0 THEN
        PERFORM pg_notify('switchboard_outbox', '');
    END IF;
    RETURN QUERY SELECT unnest(done);
END
$fn$
"""

SINGLE = """
CREATE FUNCTION switchboard_dlq_{verb}(id bigint, actor text DEFAULT 'sql:' || current_user)
RETURNS SETOF bigint LANGUAGE sql AS $fn$
    SELECT switchboard_dlq_{verb}(ARRAY[id], actor)
$fn$
"""

OUTBOX = {
    # back to its subscriber with a fresh attempt budget, due now
    "replay": """UPDATE outbox o SET status = 'pending', attempts = 0, available_at = now(), locked_by = NULL,
            locked_until = NULL, first_failed_at = NULL
        FROM letter WHERE o.id = letter.outbox_id""",
    "discard": "DELETE FROM outbox o USING letter WHERE o.id = letter.outbox_id",
}
ACTION = {"replay": "replayed", "discard": "discarded"}


def upgrade() -> None:
    op.execute("ALTER TABLE dead_letters ADD COLUMN compensation text")
    for verb in ("replay", "discard"):
        op.execute(RESOLVE.format(verb=verb, action=ACTION[verb], outbox=OUTBOX[verb]))
        op.execute(SINGLE.format(verb=verb))


def downgrade() -> None:
    for verb in ("replay", "discard"):
        op.execute(f"DROP FUNCTION switchboard_dlq_{verb}(bigint, text)")
        op.execute(f"DROP FUNCTION switchboard_dlq_{verb}(bigint[], text)")
    op.execute("ALTER TABLE dead_letters DROP COLUMN compensation")
