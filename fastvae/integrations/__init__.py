"""Integrations with other libraries' models; each module imports its library only when used."""
