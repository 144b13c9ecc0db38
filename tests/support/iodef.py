"""The IODEF 2.0 document the pubsub tests publish (RFC 8600's example incident)."""

IODEF_NS = "urn:ietf:params:xml:ns:iodef-2.0"
IODEF = f"""<IODEF-Document version="2.00" xml:lang="en" xmlns="{IODEF_NS}">
  <Incident purpose="reporting" restriction="private">
    <IncidentID name="csirt.example.com">492382</IncidentID>
    <GenerationTime>2015-07-18T09:00:00-05:00</GenerationTime>
    <Contact type="organization" role="creator">
      <Email><EmailTo>contact@csirt.example.com</EmailTo></Email>
    </Contact>
  </Incident>
</IODEF-Document>"""
