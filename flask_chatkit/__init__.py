"""flask-chatkit: serve OpenAI ChatKit from a synchronous Flask app.

chatkit = ChatKit(app, MyServer)   # MyServer subclasses chatkit.server.ChatKitServer
"""

from .attachments import FileAttachmentStore
from .bridge.sync import sync_to_async, sync_to_async_iter
from .context import RequestContext
from .extension import ChatKit
from .storage.disk import AttachmentStorage, DiskStorage
from .storage.sql import SQLAlchemyStore

__all__ = [
    "AttachmentStorage",
    "ChatKit",
    "DiskStorage",
    "FileAttachmentStore",
    "RequestContext",
    "SQLAlchemyStore",
    "sync_to_async",
    "sync_to_async_iter",
]
__version__ = "0.1.0"
