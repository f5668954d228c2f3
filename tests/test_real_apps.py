"""Unchanged Flask applications in the styles people write them, audited with no code change.

Each app of tests/apps (none imports otel-audit) runs as a user would run it:
its own ``flask init-db``, then ``opentelemetry-instrument gunicorn -w 2``
with only ``OTEL_AUDIT_*`` settings, driven over real HTTP. For each: who did
what, on which resource, with which outcome and which data writes, in one
trail; failed and successful logins and logouts; a request record committed
before each view and the outcome after; no password, password hash or token
in the ledger bytes or in any export; and ``otel-audit verify`` passes.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import secrets
import sqlite3
import subprocess
import sys
from typing import Any
from urllib.parse import quote_plus

import jsonschema
import psycopg
import requests

from otel_audit import vocabulary as v
from otel_audit.cli import main as cli_main
from otel_audit.engine.ledger import Query, open_ledger
from otel_audit.engine.ledger.postgres import SCHEMA as PG_SCHEMA
from otel_audit.review.export.ocsf import OCSF_VERSION
from tests.plugins.flask_service import base_env

APPS = pathlib.Path(__file__).parent / "apps"
_BIN = pathlib.Path(sys.executable).parent
EXPORTS = ("jsonl", "csv", "ocsf", "cadf", "jaeger", "otlp-json")


# -- helpers -----------------------------------------------------------------


def app_env(tmp_path: pathlib.Path, **extra: str) -> tuple[dict[str, str], str, pathlib.Path]:
    ledger_path = tmp_path / "audit.db"
    env = base_env(f"sqlite:///{ledger_path}", tmp_path, **extra)
    env["PYTHONPATH"] = f"{APPS}:{env['PYTHONPATH']}"
    return env, f"sqlite:///{ledger_path}", ledger_path


def init_db(app: str, env: dict[str, str], cwd: pathlib.Path) -> None:
    """The app's own setup command, as its README would say (no instrumentation)."""
    subprocess.run(
        [str(_BIN / "flask"), "--app", app, "init-db"], env=env, cwd=cwd, check=True,
        capture_output=True, timeout=60,
    )  # fmt: skip


def stored(ledger_url: str) -> list[Any]:
    with open_ledger(ledger_url, create=False, readonly=True) as ledger:
        return list(ledger.query(Query()))


def outcomes(ledger_url: str) -> list[Any]:
    """The outcome record of each audited request, in ledger order."""
    return [
        s.record
        for s in stored(ledger_url)
        if s.record.attr(v.EVENT) and not s.record.attr(v.INTENT)
    ]


def effects_of(ledger_url: str, action: Any, effect: str = v.DATA_WRITE) -> list[str]:
    """SQL of the ``effect`` records in the trail of ``action``."""
    trail = action.attr(v.TRAIL_ID)
    return [
        str(r.attr("db.statement") or r.attr("db.query.text") or r.name)
        for r in (s.record for s in stored(ledger_url))
        if r.attr(v.TRAIL_ID) == trail and r.attr(v.EFFECT) == effect
    ]


def summary(rec: Any) -> tuple[Any, ...]:
    return (
        rec.attr(v.ACTION), rec.attr(v.ACTOR_ID), rec.attr(v.RESOURCE_TYPE),
        rec.attr(v.RESOURCE_ID), rec.attr(v.OUTCOME),
    )  # fmt: skip


def assert_intent_before_each_outcome(ledger_url: str) -> None:
    """Every audited request committed a record before its view ran, then its outcome."""
    seen: dict[str, int] = {}
    for s in stored(ledger_url):
        rec = s.record
        if not rec.attr(v.EVENT):
            continue
        if rec.attr(v.INTENT):
            assert rec.attr(v.OUTCOME) is None and rec.attr(v.ACTION)
            seen[rec.span_id] = s.seq
        else:
            assert rec.span_id in seen, f"no intent before {summary(rec)}"


def ledger_bytes(ledger_url: str, ledger_path: pathlib.Path | None) -> dict[str, bytes]:
    """What the ledger stores: the SQLite file and WAL, or PostgreSQL's record bodies."""
    if ledger_path is not None:
        return {p.name: p.read_bytes() for p in ledger_path.parent.glob(ledger_path.name + "*")}
    with psycopg.connect(ledger_url) as conn:
        rows = conn.execute(f"SELECT body FROM {PG_SCHEMA}.records ORDER BY chain, seq")
        return {"postgresql records": b"\n".join(bytes(body) for (body,) in rows)}


def assert_no_secrets(
    ledger_url: str,
    ledger_path: pathlib.Path | None,
    secret_values: list[str],
    ledger_dir: pathlib.Path,
) -> dict[str, bytes]:
    """No secret in the ledger's bytes nor in any export; verify passes. Returns the exports."""
    needles = set()
    for value in secret_values:
        needles.update({value, quote_plus(value)})
        if "$" in value:  # a werkzeug hash: method$salt$digest; each part alone too
            needles.update(part for part in value.split("$")[1:] if len(part) >= 8)
    blobs = ledger_bytes(ledger_url, ledger_path)
    assert any(blobs.values())
    for fmt in EXPORTS:
        out_file = ledger_dir / f"export.{fmt}"
        assert (
            cli_main(["export", "--ledger", ledger_url, "--format", fmt, "-o", str(out_file)]) == 0
        )
        blobs[f"export {fmt}"] = out_file.read_bytes()
    for where, blob in blobs.items():
        for needle in needles:
            assert needle.encode() not in blob, f"a secret is in {where}"
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        code = cli_main(["verify", "--ledger", ledger_url])
    assert code == 0, report.getvalue()
    return blobs


def assert_authentication_events(
    exported: dict[str, bytes], expected: list[tuple[Any, ...]]
) -> None:
    """Logins and logouts are OCSF Authentication (3002) events, valid by the published schema."""
    from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=OCSF_VERSION))
    validator = jsonschema.Draft202012Validator(
        schema.get_class_schema(schema.lookup_class_name_from_uid(3002), profiles=["trace"])
    )
    events = [json.loads(line) for line in exported["export ocsf"].splitlines()]
    auth = [
        e for e in events
        if e["class_uid"] == 3002 and not e["unmapped"]["attributes"].get(v.INTENT)
    ]  # fmt: skip
    for event in auth:
        assert not sorted(validator.iter_errors(event), key=str), event
    got = [(e["activity_name"], e["status"], e["user"].get("uid")) for e in auth]
    assert got == expected


# -- the Flask tutorial ---------------------------------------------------------------


def test_flask_tutorial_blog(run_service, tmp_path: pathlib.Path):
    env, ledger, ledger_path = app_env(
        tmp_path, FLASKR_DATABASE=str(tmp_path / "flaskr.sqlite"),
        FLASKR_SECRET_KEY=secrets.token_hex(16),
    )  # fmt: skip
    init_db("flaskr", env, tmp_path)
    blog = run_service(
        "flaskr:create_app()", env=env, gunicorn_workers=2, name="flaskr", ready_path="/auth/login"
    )
    url = blog.url
    pw = {"alice": "alice-" + secrets.token_hex(8), "bob": "bob-" + secrets.token_hex(8)}
    alice, bob = requests.Session(), requests.Session()
    for name, session in (("alice", alice), ("bob", bob)):
        reply = session.post(url + "/auth/register", data={"username": name, "password": pw[name]},
                             allow_redirects=False)  # fmt: skip
        assert reply.status_code == 302
    # A wrong password: the tutorial answers 200 with the form again.
    wrong = alice.post(url + "/auth/login", data={"username": "alice", "password": "guess"})
    assert wrong.status_code == 200 and "Incorrect password" in wrong.text
    for name, session in (("alice", alice), ("bob", bob)):
        reply = session.post(url + "/auth/login", data={"username": name, "password": pw[name]},
                             allow_redirects=False)  # fmt: skip
        assert reply.status_code == 302
    assert alice.post(url + "/create", data={"title": "Hello", "body": "first"}).ok
    assert alice.post(url + "/1/update", data={"title": "Hello!", "body": "edited"}).ok
    assert bob.post(url + "/1/delete").status_code == 403  # not his post
    # A forged Basic header names nobody: this app authenticates with its session.
    forged = requests.post(url + "/create", data={"title": "x", "body": "y"},
                           auth=("admin", "x"), allow_redirects=False)  # fmt: skip
    assert forged.status_code == 302
    assert alice.post(url + "/1/delete", allow_redirects=False).status_code == 302
    assert alice.get(url + "/auth/logout", allow_redirects=False).status_code == 302
    assert blog.stop() == 0

    db = sqlite3.connect(tmp_path / "flaskr.sqlite")
    ids = dict(db.execute("SELECT username, id FROM user"))
    hashes = [h for (h,) in db.execute("SELECT password FROM user")]
    a, b = str(ids["alice"]), str(ids["bob"])
    got = outcomes(ledger)
    assert [summary(r) for r in got] == [
        ("user.register", None, None, None, v.SUCCESS),
        ("user.register", None, None, None, v.SUCCESS),
        ("user.login", None, None, None, v.FAILURE),
        ("user.login", a, None, None, v.SUCCESS),
        ("user.login", b, None, None, v.SUCCESS),
        ("blog.create", a, None, None, v.SUCCESS),
        ("blog.update", a, "blog", "1", v.SUCCESS),
        ("blog.delete", b, "blog", "1", v.DENIED),
        ("blog.create", None, None, None, v.SUCCESS),  # the forged one: redirected to login
        ("blog.delete", a, "blog", "1", v.SUCCESS),
        ("user.logout", a, None, None, v.SUCCESS),
    ]
    assert got[2].attr(v.ACTOR_TYPE) == v.ACTOR_ANONYMOUS
    assert got[2].attr(v.REASON) == "no authenticated user"
    assert all(r.attr(v.ACTOR_ID) != "admin" for r in stored_records(ledger))
    # The writes made with the tutorial's connection shortcuts are in each trail.
    assert effects_of(ledger, got[0]) == ["INSERT INTO user (username, password) VALUES (?, ?)"]
    assert effects_of(ledger, got[5]) == [
        "INSERT INTO post (title, body, author_id) VALUES (?, ?, ?)"
    ]
    assert effects_of(ledger, got[6]) == ["UPDATE post SET title = ?, body = ? WHERE id = ?"]
    assert effects_of(ledger, got[7]) == [] and effects_of(ledger, got[8]) == []
    assert effects_of(ledger, got[9]) == ["DELETE FROM post WHERE id = ?"]
    assert all(
        r.attr(v.ACTOR_ID) == a for r in stored_records(ledger) if r.attr(v.EFFECT) == v.DATA_WRITE
        and r.attr(v.TRAIL_ID) in {got[5].attr(v.TRAIL_ID), got[6].attr(v.TRAIL_ID)}
    )  # fmt: skip
    assert_intent_before_each_outcome(ledger)
    exported = assert_no_secrets(ledger, ledger_path, [*pw.values(), *hashes], tmp_path)
    assert_authentication_events(exported, [
        ("Logon", "Failure", None), ("Logon", "Success", a), ("Logon", "Success", b),
        ("Logoff", "Success", a),
    ])  # fmt: skip


def stored_records(ledger_url: str) -> list[Any]:
    return [s.record for s in stored(ledger_url)]


# -- Flask-SQLAlchemy + Flask-Login ---------------------------------------------------


def test_flask_sqlalchemy_and_flask_login_with_forms(run_service, tmp_path: pathlib.Path):
    pw = {"carol": "carol-" + secrets.token_hex(8), "dan": "dan-" + secrets.token_hex(8)}
    env, ledger, ledger_path = app_env(
        tmp_path, NOTES_DATABASE_URL=f"sqlite:///{tmp_path / 'notes.db'}",
        NOTES_SECRET_KEY=secrets.token_hex(16),
        NOTES_USERS=",".join(f"{k}:{p}" for k, p in pw.items()),
        # No sqlite3 instrumentation: SQLAlchemy's own statements must still be effects
        # (its instrumentation refuses SQLAlchemy 2.1; otel-audit listens to its events).
        OTEL_PYTHON_DISABLED_INSTRUMENTATIONS="sqlite3",
    )  # fmt: skip
    init_db("notes_app", env, tmp_path)
    notes = run_service("notes_app:app", env=env, gunicorn_workers=2, ready_path="/")
    url = notes.url
    carol, dan = requests.Session(), requests.Session()
    # Wrong password: the app redirects back to its login form, like most apps.
    reply = carol.post(url + "/login", data={"username": "carol", "password": "nope"},
                       allow_redirects=False)  # fmt: skip
    assert reply.status_code == 302
    for name, session in (("carol", carol), ("dan", dan)):
        reply = session.post(url + "/login", data={"username": name, "password": pw[name]},
                             allow_redirects=False)  # fmt: skip
        assert reply.status_code == 302
    assert carol.post(url + "/notes", data={"text": "buy milk"}, allow_redirects=False).ok
    assert dan.post(url + "/notes/1/delete").status_code == 403
    assert carol.post(url + "/notes/1/delete", allow_redirects=False).status_code == 302
    assert carol.post(url + "/logout", allow_redirects=False).status_code == 302
    assert notes.stop() == 0
    log = notes.output()
    assert "database library sqlite3: not instrumented: sqlite3 is listed in" in log

    db = sqlite3.connect(tmp_path / "notes.db")
    ids = {name: str(i) for name, i in db.execute("SELECT username, id FROM user")}
    hashes = [h for (h,) in db.execute("SELECT password_hash FROM user")]
    got = outcomes(ledger)
    assert [summary(r) for r in got] == [
        ("user.login", None, None, None, v.FAILURE),
        ("user.login", ids["carol"], None, None, v.SUCCESS),
        ("user.login", ids["dan"], None, None, v.SUCCESS),
        ("note.create", ids["carol"], None, None, v.SUCCESS),
        ("note.delete", ids["dan"], "note", "1", v.DENIED),
        ("note.delete", ids["carol"], "note", "1", v.SUCCESS),
        ("user.logout", ids["carol"], None, None, v.SUCCESS),
    ]
    assert got[1].attr(v.ACTOR_AUTH) == "flask_login" and got[1].attr(v.ACTOR_ROLES) == ["member"]
    assert [s.startswith("INSERT INTO note") for s in effects_of(ledger, got[3])] == [True]
    assert [s.startswith("DELETE FROM note") for s in effects_of(ledger, got[5])] == [True]
    assert effects_of(ledger, got[4]) == []
    assert_intent_before_each_outcome(ledger)
    assert_no_secrets(ledger, ledger_path, [*pw.values(), *hashes], tmp_path)


# -- Flask-HTTPAuth tokens ------------------------------------------------------------


def test_flask_httpauth_token_api(run_service, tmp_path: pathlib.Path):
    pw = "erin-" + secrets.token_hex(8)
    env, ledger, ledger_path = app_env(
        tmp_path, TASKS_DATABASE=str(tmp_path / "tasks.db"), TASKS_USERS=f"erin:{pw}"
    )
    init_db("tasks_api", env, tmp_path)
    api = run_service("tasks_api:app", env=env, gunicorn_workers=2, ready_path="/health")
    url = api.url
    assert requests.post(url + "/api/tokens", auth=("erin", "wrong")).status_code == 401
    token = requests.post(url + "/api/tokens", auth=("erin", pw)).json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert (
        requests.post(url + "/api/tasks", json={"title": "t1"}, headers=bearer).status_code == 201
    )
    assert requests.put(url + "/api/tasks/1", json={"title": "t2"}, headers=bearer).ok
    assert requests.delete(url + "/api/tasks/1", headers=bearer).status_code == 204
    bad = {"Authorization": "Bearer " + secrets.token_urlsafe(24)}
    assert requests.post(url + "/api/tasks", json={"title": "x"}, headers=bad).status_code == 401
    # Forged Basic on a token route: refused, and nobody is named.
    assert requests.post(url + "/api/tasks", json={"title": "x"},
                         auth=("admin", "x")).status_code == 401  # fmt: skip
    assert api.stop() == 0

    db = sqlite3.connect(tmp_path / "tasks.db")
    (erin,) = [str(i) for (i,) in db.execute("SELECT id FROM users")]
    hashes = [h for (h,) in db.execute("SELECT password_hash FROM users")]
    got = outcomes(ledger)
    assert [summary(r) for r in got] == [
        ("token.create", None, None, None, v.DENIED),
        ("token.create", erin, None, None, v.SUCCESS),
        ("task.create", erin, None, None, v.SUCCESS),
        ("task.update", erin, "task", "1", v.SUCCESS),
        ("task.delete", erin, "task", "1", v.SUCCESS),
        ("task.create", None, None, None, v.DENIED),
        ("task.create", None, None, None, v.DENIED),
    ]
    assert got[2].attr(v.ACTOR_AUTH) == "flask_httpauth"
    assert effects_of(ledger, got[1]) == ["INSERT INTO tokens (token, user_id) VALUES (?, ?)"]
    assert effects_of(ledger, got[2]) == ["INSERT INTO tasks (owner_id, title) VALUES (?, ?)"]
    assert effects_of(ledger, got[3]) == [
        "UPDATE tasks SET title = ? WHERE id = ? AND owner_id = ?"
    ]
    assert effects_of(ledger, got[4]) == ["DELETE FROM tasks WHERE id = ? AND owner_id = ?"]
    assert all(r.attr(v.ACTOR_ID) != "admin" for r in stored_records(ledger))
    assert_intent_before_each_outcome(ledger)
    assert_no_secrets(ledger, ledger_path, [pw, token, *hashes], tmp_path)


# -- flask-jwt-extended, SQLAlchemy Core on PostgreSQL (psycopg) -----------------------


def test_jwt_api_on_postgresql(run_service, tmp_path: pathlib.Path, pg_server, pg_url: str):
    pw = "frank-" + secrets.token_hex(8)
    database = pg_url.replace("postgresql://", "postgresql+psycopg://", 1)
    env, _, _ = app_env(
        tmp_path, ITEMS_DATABASE_URL=database, ITEMS_USERS=f"frank:{pw}",
        ITEMS_JWT_SECRET=secrets.token_hex(32),
    )  # fmt: skip
    # The ledger on PostgreSQL too: psycopg is instrumented, yet the ledger's own
    # statements never become spans (they would be records of writing records).
    ledger = pg_server.create_database(f"ledger_{secrets.token_hex(4)}")
    env["OTEL_AUDIT_LEDGER"] = ledger
    init_db("jwt_api", env, tmp_path)
    api = run_service("jwt_api:app", env=env, gunicorn_workers=2, ready_path="/health")
    url = api.url
    assert requests.post(url + "/auth/login", json={"username": "frank", "password": "no"}
                         ).status_code == 401  # fmt: skip
    token = requests.post(url + "/auth/login", json={"username": "frank", "password": pw}
                          ).json()["access_token"]  # fmt: skip
    bearer = {"Authorization": f"Bearer {token}"}
    assert requests.post(url + "/items", json={"name": "lamp"}, headers=bearer).status_code == 201
    assert requests.delete(url + "/items/1", headers=bearer).status_code == 204
    assert requests.post(url + "/auth/logout", headers=bearer).ok
    assert requests.post(url + "/items", json={"name": "x"}, headers=bearer).status_code == 401
    assert api.stop() == 0

    with psycopg.connect(pg_url) as conn:
        hashes = [h for (h,) in conn.execute("SELECT password_hash FROM users")]
    got = outcomes(ledger)
    assert [summary(r) for r in got] == [
        ("user.login", None, None, None, v.FAILURE),
        ("user.login", "frank", None, None, v.SUCCESS),
        ("item.create", "frank", None, None, v.SUCCESS),
        ("item.delete", "frank", "item", "1", v.SUCCESS),
        ("user.logout", "frank", None, None, v.SUCCESS),
        ("item.create", None, None, None, v.DENIED),  # the revoked token
    ]
    assert got[1].attr(v.ACTOR_AUTH) == "jwt" and got[2].attr(v.ACTOR_AUTH) == "jwt"
    # One record per statement: psycopg's instrumentation traces it, SQLAlchemy adds none.
    (insert,) = effects_of(ledger, got[2])
    assert insert.startswith("INSERT INTO items")
    (delete,) = effects_of(ledger, got[3])
    assert delete.startswith("DELETE FROM items")
    (revoke,) = effects_of(ledger, got[4])
    assert revoke.startswith("INSERT INTO revoked_tokens")
    writes = [r for r in stored_records(ledger) if r.attr(v.EFFECT) == v.DATA_WRITE]
    assert {r.attr("db.system") or r.attr("db.system.name") for r in writes} == {"postgresql"}
    assert_intent_before_each_outcome(ledger)
    exported = assert_no_secrets(ledger, None, [pw, token, *hashes], tmp_path)
    assert_authentication_events(exported, [
        ("Logon", "Failure", None), ("Logon", "Success", "frank"), ("Logoff", "Success", "frank"),
    ])  # fmt: skip
