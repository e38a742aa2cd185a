//! The domain: identities, the message envelope, the wire frames and tokens.
//!
//! Nothing here knows about sockets, HTTP or AMQP, so the rules can be tested on their own and shared by the
//! gateway, the command line and the client library.

pub mod envelope;
pub mod frame;
pub mod identity;
pub mod routing;
pub mod token;

pub use envelope::{Envelope, EnvelopeError, SendType};
pub use frame::{ClientFrame, ServerFrame};
pub use identity::{Identity, IdentityError};
pub use routing::Destination;
pub use token::{TokenClaims, TokenError, TokenSigner};
