"""``flask chatkit …`` commands: init-db, prune, export.

They work on the app's :class:`~flask_chatkit.storage.sql.SQLAlchemyStore`
(``current_app.extensions["chatkit"].store``) and are synchronous.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import click
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import inspect

from .storage.sql import SQLAlchemyStore
from .storage.version import SchemaOutdated

__all__ = ["chatkit_cli"]

chatkit_cli = AppGroup("chatkit", help="Manage the ChatKit store.")


def _store() -> SQLAlchemyStore:
    state = current_app.extensions.get("chatkit")
    if state is None:
        raise click.ClickException(
            "flask-chatkit is not initialised on this app (call ChatKit(app, MyServer))."
        )
    store = getattr(state, "store", None)
    if not isinstance(store, SQLAlchemyStore):
        raise click.ClickException(
            f"this command needs a SQLAlchemyStore; the app's store is {type(store).__name__}."
        )
    return store


@chatkit_cli.command("init-db")
@with_appcontext
def init_db() -> None:
    """Create the ChatKit tables (existing tables are left alone) and record the schema version."""
    store = _store()
    wanted = list(store.metadata.tables)
    before = set(inspect(store.engine).get_table_names())
    try:
        store.create_all()
    except SchemaOutdated as exc:
        raise click.ClickException(str(exc)) from None
    url = store.engine.url.render_as_string(hide_password=True)
    created = [name for name in wanted if name not in before]
    present = [name for name in wanted if name in before]
    if created:
        click.echo(f"Created tables: {', '.join(created)}")
    if present:
        click.echo(f"Already present: {', '.join(present)}")
    click.echo(f"Schema version: {store.schema_version()}")
    click.echo(f"Database: {url}")


@chatkit_cli.command("prune")
@click.option(
    "--older-than",
    "days",
    type=click.FloatRange(min=0),
    required=True,
    metavar="DAYS",
    help="Remove threads whose last activity is older than this many days.",
)
@click.option("--dry-run", is_flag=True, help="Print what would be removed; change nothing.")
@with_appcontext
def prune(days: float, dry_run: bool) -> None:
    """Remove whole threads (items, attachments) with no activity for DAYS days,
    and attachments never linked to a thread created more than DAYS days ago.

    A thread's last activity is the newest created_at of the thread and its items.
    Attachment bytes go too, on disk or in the bucket.
    """
    store = _store()
    # UTC, like every stored time: a local-time cutoff was hours off outside UTC.
    cutoff = datetime.now(timezone.utc) - timedelta(days=days)
    removed = store.prune(cutoff, dry_run=dry_run)
    orphans = store.prune_orphan_attachments(cutoff, dry_run=dry_run)
    verb = "Would remove" if dry_run else "Removed"
    for thread_id in removed:
        click.echo(thread_id)
    for _owner, attachment_id in orphans:
        click.echo(attachment_id)
    click.echo(
        f"{verb} {len(removed)} thread(s) with no activity since {cutoff:%Y-%m-%d %H:%M} UTC, "
        f"and {len(orphans)} unsent attachment(s) created before then."
    )


@chatkit_cli.command("export")
@click.option("--user", "user_id", required=True, help="The owner key (user id) to export.")
@with_appcontext
def export(user_id: str) -> None:
    """Print one JSON object per line: {"thread": {...}, "items": [...]}, oldest first."""
    for record in _store().export_owner(user_id):
        click.echo(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
