//! Tickets: what a peer needs to dial an endpoint, as one copyable string.

use std::fmt;
use std::str::FromStr;

use iroh::EndpointAddr;
use iroh_tickets::endpoint::EndpointTicket;

use crate::Error;

/// An endpoint's id and addresses as one string (`endpoint…`, iroh's own ticket format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket(EndpointTicket);

impl Ticket {
    /// The id of the endpoint it dials.
    pub fn peer(&self) -> String {
        self.0.endpoint_addr().id.to_string()
    }

    pub(crate) fn endpoint_addr(&self) -> &EndpointAddr {
        self.0.endpoint_addr()
    }
}

impl From<EndpointAddr> for Ticket {
    fn from(addr: EndpointAddr) -> Self {
        Self(EndpointTicket::new(addr))
    }
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Ticket {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        EndpointTicket::from_str(text.trim())
            .map(Self)
            .map_err(|err| Error::BadTicket {
                reason: err.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_typed_error() {
        for text in ["", "endpoint", "endpointzz!", "blob123", "endpointaaaa"] {
            let err = text.parse::<Ticket>().expect_err(text);
            assert_eq!(err.code(), "ERR_BAD_TICKET", "{text}: {err}");
        }
    }

    #[test]
    fn a_ticket_reads_back_as_itself() {
        let id = iroh::SecretKey::from_bytes(&[7; 32]).public();
        let addr = EndpointAddr::new(id).with_ip_addr("127.0.0.1:4242".parse().expect("addr"));
        let ticket = Ticket::from(addr);
        let again: Ticket = ticket.to_string().parse().expect("parses");
        assert_eq!(again, ticket);
        assert_eq!(again.peer(), id.to_string());
    }
}
