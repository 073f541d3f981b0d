"""Trigger functions and CREATE TRIGGER statements, one file per table (package data).

Files carry a version suffix (``documents_v1.sql``); a released file is never edited:
a later migration includes a ``_v2`` file that replaces the functions cleanly.
"""
