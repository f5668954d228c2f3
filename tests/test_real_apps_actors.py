"""The shapes a Flask app's user takes: each gives the same actor, and only id and roles are read."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

import pytest
from flask_login import AnonymousUserMixin, UserMixin
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from otel_audit.errors import ConfigError
from otel_audit.integrations.actors import OperatorResolver, actor_from_user


class Base(DeclarativeBase):
    pass


class OrmUser(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str]
    password_hash: Mapped[str]


@dataclass
class DataUser:
    id: int
    username: str
    roles: list[str] = field(default_factory=list)


class LoginUser(UserMixin):
    def __init__(self, ident: str) -> None:
        self._ident = ident

    def get_id(self) -> str:
        return self._ident


class NamedOnly:
    username = "ada"


def _row() -> sqlite3.Row:
    con = sqlite3.connect(":memory:")
    con.row_factory = sqlite3.Row
    return con.execute(
        "SELECT 7 AS id, 'ada' AS username, 'scrypt:1$salt$hash' AS password"
    ).fetchone()


@pytest.mark.parametrize(
    ("user", "ident", "roles"),
    [
        (_row(), "7", ()),
        ({"id": 7, "username": "ada", "password": "x"}, "7", ()),
        ({"username": "ada"}, "ada", ()),
        (DataUser(7, "ada", ["admin", "staff"]), "7", ("admin", "staff")),
        (OrmUser(id=7, username="ada", password_hash="h"), "7", ()),
        (LoginUser("7"), "7", ()),
        (NamedOnly(), "ada", ()),
        ({"id": 7, "roles": [{"name": "admin"}]}, "7", ("admin",)),
        ({"id": 7, "role": "editor"}, "7", ("editor",)),
        ("ada", "ada", ()),
        (7, "7", ()),
    ],
)
def test_every_common_user_shape_names_the_same_actor(user, ident, roles):
    actor = actor_from_user(user, "app")
    assert actor is not None and (actor.id, actor.roles, actor.auth) == (ident, roles, "app")
    assert "hash" not in repr(actor) and "password" not in repr(actor)


@pytest.mark.parametrize(
    "user", [None, True, False, "", AnonymousUserMixin(), {"name": ""}, object()]
)
def test_no_user_is_nobody(user):
    assert actor_from_user(user, "app") is None


@pytest.mark.parametrize("spec", ["nocolon", "mod:", ":fn", "mod:not-an-identifier"])
def test_an_operator_resolver_must_be_module_function(spec):
    with pytest.raises(ConfigError, match="OTEL_AUDIT_ACTOR_RESOLVER must be 'module:function'"):
        OperatorResolver(spec, "OTEL_AUDIT_ACTOR_RESOLVER")
