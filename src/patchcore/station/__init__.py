"""The inspection station: ``patchcore watch`` scores every photo that lands in a folder, exactly
once, and records each verdict in the history database, which the service can write too.

Modules: :mod:`.schema` (the tables), :mod:`.history` (open, migrate, record, query),
:mod:`.writer` (commits beside scoring), :mod:`.inbox` (when a file is complete),
:mod:`.watch` (the station itself). Imports: the engine only.
"""

#: The history file ``watch`` keeps in its output folder unless told otherwise.
DEFAULT_FILE = "history.db"
#: Folder of the output folder that unreadable photos are moved to.
REJECTED = "rejected"
