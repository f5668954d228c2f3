"""Items: a JSON API with flask-jwt-extended and SQLAlchemy Core; logout revokes the token."""

import os
from datetime import timedelta

from flask import Flask, jsonify, request
from flask_jwt_extended import (
    JWTManager,
    create_access_token,
    current_user,
    get_jwt,
    jwt_required,
)
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    delete,
    insert,
    select,
)
from werkzeug.security import check_password_hash, generate_password_hash

app = Flask(__name__)
app.config["JWT_SECRET_KEY"] = os.environ.get(
    "ITEMS_JWT_SECRET", "dev-secret-dev-secret-dev-secret!"
)
app.config["JWT_ACCESS_TOKEN_EXPIRES"] = timedelta(hours=1)
jwt = JWTManager(app)
engine = create_engine(os.environ["ITEMS_DATABASE_URL"])
metadata = MetaData()
users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String, unique=True),
    Column("password_hash", String),
)
items = Table(
    "items",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner", String),
    Column("name", String),
)
revoked = Table("revoked_tokens", metadata, Column("jti", String, primary_key=True))


@jwt.user_lookup_loader
def user_lookup(_header, data):
    with engine.connect() as conn:
        return conn.execute(select(users).where(users.c.username == data["sub"])).mappings().first()


@jwt.token_in_blocklist_loader
def is_revoked(_header, payload):
    with engine.connect() as conn:
        return (
            conn.execute(select(revoked).where(revoked.c.jti == payload["jti"])).first() is not None
        )


@app.get("/health")
def health():
    return {"ok": True}


@app.post("/auth/login")
def login():
    body = request.get_json()
    with engine.connect() as conn:
        user = conn.execute(select(users).where(users.c.username == body.get("username"))).first()
    if user is None or not check_password_hash(user.password_hash, body.get("password", "")):
        return jsonify(msg="bad username or password"), 401
    return jsonify(access_token=create_access_token(identity=user.username))


@app.post("/auth/logout")
@jwt_required()
def logout():
    with engine.begin() as conn:
        conn.execute(insert(revoked).values(jti=get_jwt()["jti"]))
    return jsonify(msg="logged out")


@app.post("/items")
@jwt_required()
def create_item():
    with engine.begin() as conn:
        result = conn.execute(
            insert(items).values(owner=current_user["username"], name=request.get_json()["name"])
        )
    return jsonify(id=result.inserted_primary_key[0]), 201


@app.delete("/items/<int:item_id>")
@jwt_required()
def delete_item(item_id):
    with engine.begin() as conn:
        conn.execute(
            delete(items).where(items.c.id == item_id, items.c.owner == current_user["username"])
        )
    return "", 204


@app.cli.command("init-db")
def init_db():
    """Create the tables and the users named in ITEMS_USERS (name:password,...)."""
    metadata.create_all(engine)
    pairs = [p.split(":", 1) for p in os.environ.get("ITEMS_USERS", "").split(",") if p]
    with engine.begin() as conn:
        for name, password in pairs:
            conn.execute(
                insert(users).values(username=name, password_hash=generate_password_hash(password))
            )
