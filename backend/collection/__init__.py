"""Collection: webhook events are stored first, then parsed into annotation rows; a spool when SQL is down."""
