"""The ground floor: one owner for each file format the pack shares (safe checkpoint reading, atomic
writes). Imports nothing else of the pack."""
