"""Renderers of the export endpoint and of server-sent events."""

import json

from rest_framework import renderers


class ExportJSONRenderer(renderers.JSONRenderer):
    """The JSON transcript (``?format=json``), indented for people who open the file."""

    format = "json"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return json.dumps(data, ensure_ascii=False, indent=2).encode() + b"\n"


class MarkdownRenderer(renderers.BaseRenderer):
    """The transcript as Markdown (``?format=markdown``): a title, then each visible
    message under a heading naming its role; stopped or failed answers say so."""

    media_type = "text/markdown"
    format = "markdown"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        conversation = data["conversation"]
        lines = [f"# {conversation['title'] or 'Untitled conversation'}", ""]
        lines.append(
            f"- Model: {conversation['model'] or 'default'}\n"
            f"- Created: {conversation['created_at']}\n"
            f"- Exported: {data['exported_at']}"
        )
        if conversation["system_prompt"]:
            lines += ["", "## System", "", conversation["system_prompt"]]
        for message in data["messages"]:
            heading = message["role"].capitalize()
            if message["status"] != "completed":
                heading += f" ({message['status']})"
            lines += ["", f"## {heading}", "", message["content"] or "*(no text)*"]
            if message.get("error"):
                lines += ["", f"> Error: {message['error']}"]
        return ("\n".join(lines) + "\n").encode()


class EventStreamRenderer(renderers.BaseRenderer):
    """``text/event-stream``: lets content negotiation accept ``Accept:
    text/event-stream`` on the post-message endpoint. The stream itself is written by
    the view (chat.api.sse); this only renders a body given as a dict as one ``error``
    event, which does not happen in practice because error bodies are rendered as
    JSON."""

    media_type = "text/event-stream"
    format = "sse"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        return f"event: error\ndata: {json.dumps(data)}\n\n".encode()
