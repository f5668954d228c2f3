"""Tasks: a JSON API with Flask-HTTPAuth (basic auth for a token, token auth for the rest)."""

import os
import secrets
import sqlite3

from flask import Flask, g, request
from flask_httpauth import HTTPBasicAuth, HTTPTokenAuth
from werkzeug.security import check_password_hash, generate_password_hash

app = Flask(__name__)
basic_auth = HTTPBasicAuth()
token_auth = HTTPTokenAuth(scheme="Bearer")
DATABASE = os.environ["TASKS_DATABASE"]


def get_db():
    if "db" not in g:
        g.db = sqlite3.connect(DATABASE, timeout=30)
        g.db.row_factory = sqlite3.Row
    return g.db


@app.teardown_appcontext
def close_db(exc):
    db = g.pop("db", None)
    if db is not None:
        db.close()


@basic_auth.verify_password
def verify_password(username, password):
    user = get_db().execute("SELECT * FROM users WHERE username = ?", (username,)).fetchone()
    if user is not None and check_password_hash(user["password_hash"], password):
        return user
    return None


@token_auth.verify_token
def verify_token(token):
    return (
        get_db()
        .execute(
            "SELECT users.* FROM tokens JOIN users ON users.id = tokens.user_id"
            " WHERE tokens.token = ?",
            (token,),
        )
        .fetchone()
    )


@app.get("/health")
def health():
    return {"ok": True}


@app.post("/api/tokens")
@basic_auth.login_required
def get_token():
    token = secrets.token_urlsafe(24)
    db = get_db()
    db.execute(
        "INSERT INTO tokens (token, user_id) VALUES (?, ?)",
        (token, basic_auth.current_user()["id"]),
    )
    db.commit()
    return {"token": token}, 201


@app.post("/api/tasks")
@token_auth.login_required
def create_task():
    db = get_db()
    cur = db.execute(
        "INSERT INTO tasks (owner_id, title) VALUES (?, ?)",
        (token_auth.current_user()["id"], request.get_json()["title"]),
    )
    db.commit()
    return {"id": cur.lastrowid}, 201


@app.put("/api/tasks/<int:task_id>")
@token_auth.login_required
def update_task(task_id):
    db = get_db()
    db.execute(
        "UPDATE tasks SET title = ? WHERE id = ? AND owner_id = ?",
        (request.get_json()["title"], task_id, token_auth.current_user()["id"]),
    )
    db.commit()
    return {"id": task_id}


@app.delete("/api/tasks/<int:task_id>")
@token_auth.login_required
def delete_task(task_id):
    db = get_db()
    db.execute(
        "DELETE FROM tasks WHERE id = ? AND owner_id = ?",
        (task_id, token_auth.current_user()["id"]),
    )
    db.commit()
    return "", 204


@app.cli.command("init-db")
def init_db():
    """Create the tables and the users named in TASKS_USERS (name:password,...)."""
    db = sqlite3.connect(DATABASE)
    db.executescript(
        """
        CREATE TABLE users (id INTEGER PRIMARY KEY, username TEXT UNIQUE, password_hash TEXT);
        CREATE TABLE tokens (token TEXT PRIMARY KEY, user_id INTEGER);
        CREATE TABLE tasks (id INTEGER PRIMARY KEY, owner_id INTEGER, title TEXT);
        """
    )
    users = [p.split(":", 1) for p in os.environ.get("TASKS_USERS", "").split(",") if p]
    db.executemany(
        "INSERT INTO users (username, password_hash) VALUES (?, ?)",
        [(name, generate_password_hash(pw)) for name, pw in users],
    )
    db.commit()
    db.close()
