"""IODEF 2.0 (RFC 7970) schema validation: of published payloads by the broker (optional), of
every document the bridge makes (always), so both share it from the core.

The schema imports three vocabularies from the network (XML Signature, the IANA enum and SCI
schemas) and ``xml.xsd``; nothing here fetches anything, so a resolver maps those locations
to local stand-ins (in ``schemas/``) that declare the referenced elements with any content. The
IODEF structure itself is checked in full.
"""

from __future__ import annotations

from pathlib import Path

from lxml import etree

IODEF_NS = "urn:ietf:params:xml:ns:iodef-2.0"
SCHEMAS = Path(__file__).parent / "schemas"
_STAND_INS = {
    "xmldsig-core-schema.xsd": "xmldsig-stub.xsd",
    "http://www.iana.org/assignments/xml-registry/schema/iodef-enum-1.0.xsd":
        "iodef-enum-stub.xsd",
    "http://www.iana.org/assignments/xml-registry/schema/iodef-sci-1.0.xsd":
        "iodef-sci-stub.xsd",
    "http://www.w3.org/2009/01/xml.xsd": "xml-stub.xsd",
}


class _LocalSchemas(etree.Resolver):
    """Serve the schema's imports from the package folder, never from the network."""

    def resolve(self, url, pubid, context):
        for location, local in _STAND_INS.items():
            if url == location or url.endswith("/" + location):
                return self.resolve_filename(str(SCHEMAS / local), context)
        return None


class IODEFValidator:
    """Checks a payload element against the IODEF 2.0 schema; loaded once, reused."""

    def __init__(self) -> None:
        parser = etree.XMLParser(no_network=True, resolve_entities=False, load_dtd=False)
        parser.resolvers.add(_LocalSchemas())
        document = etree.parse(str(SCHEMAS / "iodef-2.0.xsd"), parser)
        self._schema = etree.XMLSchema(document)

    def problem(self, payload: etree._Element) -> str | None:
        """None if the document is valid, else the first schema error as one line."""
        if self._schema.validate(etree.ElementTree(payload)):
            return None
        error = self._schema.error_log.last_error
        return f"line {error.line}: {error.message}" if error else "invalid IODEF document"
