"""Every input Keras takes, split across processes (`adapters`)."""
