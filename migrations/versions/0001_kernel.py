"""Kernel tables: events, outbox, dead_letters (+ history), inbox, services, checkpoints.

Revision ID: 0001
Revises:
"""

from alembic import op

from app.migrate import run_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(op, """
    CREATE TABLE events (
        position    bigserial PRIMARY KEY,            -- global order of every append
        event_id    uuid NOT NULL,
        stream_id   text NOT NULL,                    -- "<stream type>-<aggregate id>"
        version     integer NOT NULL,                 -- 1, 2, … within the stream
        type        text NOT NULL,                    -- stable topic, e.g. "orders.OrderPlaced"
        data        jsonb NOT NULL,
        metadata    jsonb NOT NULL DEFAULT '{}',      -- correlation_id, causation_id, trace
        created_at  timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT events_stream_version UNIQUE (stream_id, version)  -- optimistic concurrency
    );

    CREATE TABLE outbox (
        id              bigserial PRIMARY KEY,
        message_id      uuid NOT NULL,                -- the event's id
        position        bigint NOT NULL,              -- the event's global position
        subscriber      text NOT NULL,                -- stable subscription name, "payments.charge_order"
        type            text NOT NULL,
        partition_key   text NOT NULL,                -- the event's stream: ordering scope
        payload         jsonb NOT NULL,
        headers         jsonb NOT NULL DEFAULT '{}',
        status          text NOT NULL DEFAULT 'pending'
                        CHECK (status IN ('pending', 'inflight', 'blocked', 'dead', 'delivered')),
        attempts        integer NOT NULL DEFAULT 0,
        available_at    timestamptz NOT NULL DEFAULT now(),
        locked_by       text,
        locked_until    timestamptz,
        last_error      text,
        first_failed_at timestamptz,
        blocked_by      bigint,                       -- dead_letters.id this row is parked behind
        created_at      timestamptz NOT NULL DEFAULT now(),
        delivered_at    timestamptz,                  -- kept for the retention period, then purged
        CONSTRAINT outbox_subscriber_message UNIQUE (subscriber, message_id)
    ) WITH (autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000,
            autovacuum_vacuum_insert_scale_factor = 0.0, autovacuum_vacuum_insert_threshold = 5000);
    CREATE INDEX outbox_key_order ON outbox (subscriber, partition_key, id) WHERE status <> 'delivered';
    CREATE INDEX outbox_delivered ON outbox (delivered_at) WHERE status = 'delivered';
    CREATE INDEX outbox_due ON outbox (id) WHERE status = 'pending';
    CREATE INDEX outbox_leases ON outbox (locked_until) WHERE status = 'inflight';

    CREATE TABLE dead_letters (
        id              bigserial PRIMARY KEY,
        outbox_id       bigint NOT NULL,
        message_id      uuid NOT NULL,
        position        bigint NOT NULL,
        subscriber      text NOT NULL,
        type            text NOT NULL,
        partition_key   text NOT NULL,
        payload         jsonb NOT NULL,
        headers         jsonb NOT NULL,
        attempts        integer NOT NULL,
        error_type      text NOT NULL,
        error_message   text NOT NULL,
        error_traceback text,
        first_failed_at timestamptz NOT NULL,
        last_failed_at  timestamptz NOT NULL,
        status          text NOT NULL DEFAULT 'parked' CHECK (status IN ('parked', 'replayed', 'discarded')),
        resolved_at     timestamptz,
        resolved_by     text,
        created_at      timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX dead_letters_parked ON dead_letters (subscriber, id) WHERE status = 'parked';

    CREATE TABLE dead_letter_history (
        id              bigserial PRIMARY KEY,
        dead_letter_id  bigint NOT NULL REFERENCES dead_letters (id),
        action          text NOT NULL CHECK (action IN ('parked', 'replayed', 'discarded')),
        actor           text NOT NULL,
        at              timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX dead_letter_history_letter ON dead_letter_history (dead_letter_id);

    CREATE TABLE inbox (
        subscriber   text NOT NULL,
        message_id   uuid NOT NULL,
        processed_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (subscriber, message_id)
    );

    CREATE TABLE services (
        instance_id  text PRIMARY KEY,
        modules      text[] NOT NULL,
        base_url     text,
        version      text NOT NULL,
        started_at   timestamptz NOT NULL DEFAULT now(),
        heartbeat_at timestamptz NOT NULL DEFAULT now()
    );

    CREATE TABLE checkpoints (
        name        text PRIMARY KEY,                 -- a projection's subscriber name
        position    bigint NOT NULL,                  -- highest event position it has applied
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    """)


def downgrade() -> None:
    run_script(op, """
    DROP TABLE checkpoints, services, inbox, dead_letter_history, dead_letters, outbox, events;
    """)
