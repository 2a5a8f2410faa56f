"""qframe's built-in plugins. Each module is registered from ``qframe.plugins.BUILTIN_MODULES``
exactly as a third-party plugin would be from an entry point."""
