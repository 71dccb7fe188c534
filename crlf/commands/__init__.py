"""The command layer: the only modules that read the settings (crlf.settings). Each builds the library's typed
configs from its settings and calls the torch library; crlf.cli maps subcommands onto these functions."""
