"""twistd plugins of sixnet: wiring only; options and makeService live in sixnet.app.tap."""

from twisted.application.service import ServiceMaker

sixnet = ServiceMaker("sixnet", "sixnet.app.tap", "every sixnet service the configuration enables",
                      "sixnet")
sixnet_irp = ServiceMaker("sixnet-irp", "sixnet.app.tap.irp", "the IRP registry (TCP 4604)",
                          "sixnet-irp")
sixnet_chat = ServiceMaker("sixnet-chat", "sixnet.app.tap.chat",
                           "the SixChat End2End Direct user agent (TCP 4605)", "sixnet-chat")
sixnet_grid = ServiceMaker("sixnet-grid", "sixnet.app.tap.grid",
                           "the XMPP-Grid controller and broker", "sixnet-grid")
