"""Generators and helpers for what ships beside the package: dashboards, rules for tests."""
