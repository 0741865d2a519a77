"""``manage.py runserver``: daphne's development server, serving with
:class:`chatproject.server.ChatServer` (flow control for each WebSocket) through the
command's ``server_cls`` switch. ``chat`` is listed before ``daphne`` in
INSTALLED_APPS so that this command is the one Django finds."""

from daphne.management.commands.runserver import Command as DaphneRunserver

from chatproject.server import ChatServer


class Command(DaphneRunserver):
    server_cls = ChatServer
