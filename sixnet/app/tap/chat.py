"""twistd plugin ``sixnet-chat``: only the chat service, from the same configuration file."""

from sixnet.app.tap import Options as _AllOptions
from sixnet.app.tap import makeService

__all__ = ["Options", "makeService"]


class Options(_AllOptions):
    service = "chat"
