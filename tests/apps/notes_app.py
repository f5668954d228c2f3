"""Notes: Flask-SQLAlchemy models, Flask-Login sessions and HTML forms."""

import os

from flask import Flask, abort, flash, redirect, render_template_string, request, url_for
from flask_login import (
    LoginManager,
    UserMixin,
    current_user,
    login_required,
    login_user,
    logout_user,
)
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from werkzeug.security import check_password_hash, generate_password_hash


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
login_manager = LoginManager()
login_manager.login_view = "login"

app = Flask(__name__)
app.config["SECRET_KEY"] = os.environ.get("NOTES_SECRET_KEY", "dev")
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["NOTES_DATABASE_URL"]
db.init_app(app)
login_manager.init_app(app)


class User(UserMixin, db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(unique=True)
    password_hash: Mapped[str]
    role: Mapped[str] = mapped_column(default="member")


class Note(db.Model):
    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(db.ForeignKey("user.id"))
    text: Mapped[str]


@login_manager.user_loader
def load_user(user_id):
    return db.session.get(User, int(user_id))


FORM = "<form method=post><input name=username><input type=password name=password></form>"


@app.get("/")
def home():
    return "notes"


@app.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "POST":
        user = db.session.execute(
            db.select(User).filter_by(username=request.form["username"])
        ).scalar_one_or_none()
        if user is not None and check_password_hash(user.password_hash, request.form["password"]):
            login_user(user)
            return redirect(url_for("home"))
        flash("Invalid username or password")
        return redirect(url_for("login"))
    return render_template_string(FORM)


@app.post("/logout")
@login_required
def logout():
    logout_user()
    return redirect(url_for("login"))


@app.post("/notes")
@login_required
def add_note():
    note = Note(owner_id=current_user.id, text=request.form["text"])
    db.session.add(note)
    db.session.commit()
    return redirect(url_for("home"))


@app.post("/notes/<int:note_id>/delete")
@login_required
def delete_note(note_id):
    note = db.get_or_404(Note, note_id)
    if note.owner_id != current_user.id:
        abort(403)
    db.session.delete(note)
    db.session.commit()
    return redirect(url_for("home"))


@app.cli.command("init-db")
def init_db():
    """Create the tables and the users named in NOTES_USERS (name:password,...)."""
    db.create_all()
    for pair in os.environ.get("NOTES_USERS", "").split(","):
        if pair:
            name, password = pair.split(":", 1)
            db.session.add(User(username=name, password_hash=generate_password_hash(password)))
    db.session.commit()
