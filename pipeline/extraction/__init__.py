"""Stage one: plan an update of a feature cache and run the backbone over what it needs (local or Ray)."""
