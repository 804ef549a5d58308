"""Fault injection for the tests, installed through the seams production code offers
(trainer callbacks, the cache build's hooks); nothing here is imported by distkd."""
