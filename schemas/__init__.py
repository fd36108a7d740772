"""Versioned Arrow schemas of the output tables (JSON files beside this one)."""
