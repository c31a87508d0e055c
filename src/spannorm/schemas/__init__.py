"""JSON Schemas of the files spannorm writes (package data)."""
