"""drf-spectacular post-processing of the OpenAPI schema (``POSTPROCESSING_HOOKS``).

drf-spectacular documents an enum field that also takes ``""`` as ``oneOf`` its enum
and a component it always names ``BlankEnum`` (``ENUM_ADD_EXPLICIT_BLANK_NULL_CHOICE``),
a name ``ENUM_NAME_OVERRIDES`` cannot change: it names the choices' component only. The
one such field here is a conversation's ``model`` (chat.api.fields.ModelNameField),
whose empty value means the server's default model, so the component says that.
"""

from __future__ import annotations

BLANK = "BlankEnum"
DEFAULT_MODEL = "DefaultModelEnum"
DEFAULT_MODEL_SCHEMA = {
    "enum": [""],
    "description": "Empty: the server's default model (CHAT_MODEL).",
}


def name_blank_enum(result: dict, generator, request, public: bool) -> dict:
    """Rename the ``BlankEnum`` component of ``result`` (an OpenAPI document as a dict)
    to ``DEFAULT_MODEL`` and point every reference at it; a schema without it is returned
    as it is. The signature is drf-spectacular's for post-processing hooks."""
    schemas = result.get("components", {}).get("schemas", {})
    if BLANK not in schemas:
        return result
    del schemas[BLANK]
    schemas[DEFAULT_MODEL] = DEFAULT_MODEL_SCHEMA
    old, new = f"#/components/schemas/{BLANK}", f"#/components/schemas/{DEFAULT_MODEL}"

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and value == old:
                    node[key] = new
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(result)
    return result
