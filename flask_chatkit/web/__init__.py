"""The Flask surface: the ChatKit view, attachment routes, errors, security, console."""
