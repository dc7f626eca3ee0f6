"""Running stages on Ray: the session (`ray_session`), stage configs made
into Ray Data steps (`stages`), and per-stage timing (`timing`)."""
