from lorapipe_app.cli import entry

entry()
