//! One reconcile pass over every app: desired against actual, into a plan.
