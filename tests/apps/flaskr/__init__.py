"""The Flask tutorial's blog (flaskr), written the way the tutorial writes it."""

import os

from flask import Flask


def create_app(test_config=None):
    app = Flask(__name__, instance_relative_config=True)
    app.config.from_mapping(
        SECRET_KEY=os.environ.get("FLASKR_SECRET_KEY", "dev"),
        DATABASE=os.environ.get("FLASKR_DATABASE")
        or os.path.join(app.instance_path, "flaskr.sqlite"),
    )
    if test_config is not None:
        app.config.from_mapping(test_config)

    from . import auth, blog, db

    db.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(blog.bp)
    app.add_url_rule("/", endpoint="index")
    return app
