"""takakryptd: the long-running agent that enforcement points talk to."""
