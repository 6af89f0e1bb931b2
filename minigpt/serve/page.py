"""The web page at / (the page engineer's; this stand-in has no routes yet)."""

from fastapi import APIRouter

router = APIRouter()
