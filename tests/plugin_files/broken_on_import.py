"""A plugin that fails to import: it must be reported and skipped, nothing else breaks."""

raise ImportError("this plugin is broken on purpose")
