"""Everything that changes someone else's code lives here; see ``base.Patch`` for the rules every patch follows."""
