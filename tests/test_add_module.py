"""Adding a module takes what docs/ARCHITECTURE.md "Add a module" says and nothing else: a throwaway
module, written to a temporary package of its own, boots beside the real ones, runs its command
through the mediator and gets its event through the relay; the truncate list finds tables itself."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid

import pytest

from app.bootstrap import bootstrap, load_modules
from app.relay import Relay
from tests.conftest import schema_tables

FILES = {
    "__init__.py": '"""Labels owns the shipping labels printed for parcels."""\n',
    "commands.py": '''
        from uuid import UUID

        from app.messages import Command


        class PrintLabel(Command):
            """Print a label with this text."""

            label_id: UUID
            text: str
    ''',
    "events.py": '''
        from uuid import UUID

        from app.messages import Event


        class LabelPrinted(Event, tag="labels.LabelPrinted"):
            """A label was printed."""

            label_id: UUID
            text: str
    ''',
    "aggregate.py": """
        from app.aggregate import Aggregate
        from {package}.events import LabelPrinted


        class Label(Aggregate):
            stream_type = "label"

            @classmethod
            def print(cls, id, text):
                label = cls(id)
                label._record(LabelPrinted(label_id=id, text=text))
                return label

            def _apply(self, event):
                self.text = event.text
    """,
    "handlers.py": """
        from {package}.aggregate import Label

        ARCHIVE_COLUMNS = {{"label_id": "uuid", "text": "text"}}


        async def print_label(cmd, uow):
            async with uow:
                uow.add(Label.print(cmd.label_id, cmd.text))
                await uow.commit()


        async def archive_label(event, uow):
            uow.stage("labels_archive", ARCHIVE_COLUMNS, [(event.label_id, event.text)])
            await uow.commit()
    """,
    "module.py": """
        from app.wiring import Module, Subscription
        from {package} import handlers
        from {package}.commands import PrintLabel
        from {package}.events import LabelPrinted

        module = Module(
            name="labels",
            package="{package}",
            commands={{PrintLabel: handlers.print_label}},
            subscriptions={{LabelPrinted: [Subscription("labels.archive_label", handlers.archive_label)]}},
        )
    """,
}


@pytest.fixture
def labels_package(tmp_path, monkeypatch):
    """The module's files under tmp_path, importable as a package no other test uses."""
    package = f"switchboard_labels_{uuid.uuid4().hex[:8]}"
    (tmp_path / package).mkdir()
    for name, source in FILES.items():
        (tmp_path / package / name).write_text(textwrap.dedent(source).lstrip().format(package=package))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield package
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


@pytest.fixture
async def labels_table(db):
    """The migration a real module would ship: its table, named with its prefix."""
    await db.execute("CREATE TABLE labels_archive (label_id uuid PRIMARY KEY, text text NOT NULL)")
    yield
    await db.execute("DROP TABLE labels_archive")


@pytest.mark.outbox_retention(3600)  # reads delivered rows
async def test_a_new_module_boots_with_the_real_ones_and_runs_its_command_and_its_subscriber(
    settings, db, labels_package, labels_table
):
    labels = importlib.import_module(f"{labels_package}.module").module
    commands = importlib.import_module(f"{labels_package}.commands")
    system = bootstrap(settings, db, modules=[*load_modules(), labels])
    label_id = uuid.uuid4()

    await system.mediator.send(commands.PrintLabel(label_id=label_id, text="to: Ada"))
    assert await db.fetchval("SELECT type FROM events WHERE stream_id = $1", f"label-{label_id}") == (
        "labels.LabelPrinted"
    )
    await Relay(system, instance_id="relay-test").drain()

    archived = await db.fetch("SELECT label_id, text FROM labels_archive")
    assert [tuple(r) for r in archived] == [(label_id, "to: Ada")]
    assert await db.fetchval("SELECT status FROM outbox WHERE subscriber = 'labels.archive_label'") == "delivered"


async def test_the_tables_emptied_between_tests_are_read_from_the_schema(db):
    names = (await schema_tables(db)).split(", ")

    assert {"events", "outbox", "inbox", "inventory_reservations", "orders_view", "snapshots"} <= set(names)
    assert "alembic_version" not in names
