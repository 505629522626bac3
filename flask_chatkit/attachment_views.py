"""Attachment upload and preview routes (filled in by the attachments work)."""

from __future__ import annotations

from flask import Blueprint


def register_attachment_routes(bp: Blueprint, methods: list[str]) -> None:
    """Add the attachment routes to the ChatKit blueprint."""
