"""The registry itself, without sockets: the protocol hands it parsed requests.

`access` says who may do what (the role x operation table), `credentials` checks passwords
and one-time codes and says what a failed password costs, `registry` does the operations,
`answers` keeps lookup answers in memory until they may change, and `watches` tells
watchers of changes and expiries.
"""
