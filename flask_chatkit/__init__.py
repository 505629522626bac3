"""flask-chatkit: serve OpenAI ChatKit from a synchronous Flask app.

chatkit = ChatKit(app, MyServer)   # MyServer subclasses chatkit.server.ChatKitServer
"""

from .attachments import FileAttachmentStore
from .bridge.sync import sync_to_async, sync_to_async_iter
from .context import RequestContext
from .extension import ChatKit
from .storage.disk import AttachmentStorage, DiskStorage
from .storage.sql import SQLAlchemyStore
from .web.request_body import MESSAGE_REQUEST_TYPES, chatkit_request_type, is_message_request

__all__ = [
    "MESSAGE_REQUEST_TYPES",
    "AttachmentStorage",
    "ChatKit",
    "DiskStorage",
    "FileAttachmentStore",
    "RequestContext",
    "SQLAlchemyStore",
    "chatkit_request_type",
    "is_message_request",
    "sync_to_async",
    "sync_to_async_iter",
]
__version__ = "0.1.0"
