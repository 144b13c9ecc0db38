"""The grid's tables: accounts, failed logins, offline messages, revoked platforms (`schema`)."""
