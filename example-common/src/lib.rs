//! Example service definition shared by the example provider and consumer
