"""The operator dashboard at /dashboard: server-rendered HTML, refreshed by htmx (vendored under
static/), behind SWITCHBOARD_ADMIN_TOKEN (a session cookie for people, a Bearer for scripts)."""
