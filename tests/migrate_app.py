"""A small app with its own Flask-SQLAlchemy model and the ChatKit store on one engine.

Used by tests/test_migrate.py through the ``flask`` command line:
``flask --app tests.migrate_app:create_app db migrate`` etc. The database URL
comes from ``MIGRATE_APP_DATABASE_URL``.
"""

from __future__ import annotations

import os

from flask import Flask
from flask_migrate import Migrate
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from flask_chatkit import ChatKit, SQLAlchemyStore

from .word_server import WordServer


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Note(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    text: Mapped[str] = mapped_column(String(200))


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY="migrate-test",
        SQLALCHEMY_DATABASE_URI=os.environ["MIGRATE_APP_DATABASE_URL"],
        CHATKIT_LOGIN_REQUIRED=False,
        CHATKIT_CREATE_TABLES=False,  # Alembic owns the schema
    )
    db.init_app(app)
    Migrate(app, db)
    with app.app_context():
        store = SQLAlchemyStore(db.engine)  # one engine for the app and ChatKit
    ChatKit(app, WordServer, store=store)
    return app
