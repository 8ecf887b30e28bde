"""Typed Dodo events: one frozen pydantic model per family, validated by the worker."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, Union

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    model_validator,
)

from shared.catalog import KIND_OF, types_of
from shared.envelope import describe_validation_error


def _no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL: a row that cannot be written would retry forever.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range in UTC") from None


def _no_float(value: object) -> object:
    # A JSON number with a fraction has already lost exactness as a binary float.
    if isinstance(value, float | bool):
        raise ValueError("must be a decimal string, not a JSON number")
    return value


# Bounds follow the columns, so a value the database would refuse is rejected here at once
# (dead, with a reason) instead of failing at write time on every retry.
Id = Annotated[str, StringConstraints(min_length=1, max_length=255), AfterValidator(_no_nul)]
Code = Annotated[str, StringConstraints(min_length=1, max_length=64), AfterValidator(_no_nul)]
Currency = Annotated[str, StringConstraints(min_length=1, max_length=16), AfterValidator(_no_nul)]
Text = Annotated[str, AfterValidator(_no_nul)]
Instant = Annotated[AwareDatetime, AfterValidator(_utc)]
MinorUnits = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
Count = Annotated[StrictInt, Field(ge=-(2**31), le=2**31 - 1)]
Amount = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    Field(allow_inf_nan=False, max_digits=40, decimal_places=20),
]


# Validation context: the JSON text holds no `\u0000`, the only way JSON can carry a NUL,
# so no string of it has one and the walk below can be skipped (parse_event).
NUL_FREE = "nul_free"


def _nul_path(value: object, path: str) -> str | None:
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in str(key):
                return f"{path}.<key>"
            found = _nul_path(item, f"{path}.{key}")
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_path(item, f"{path}[{index}]")
            if found:
                return found
    return None


class DodoObject(BaseModel):
    """Dodo's `data` object: typed fields the handlers use, and the object as delivered.

    `delivered` is stored as it came (JSON), so the read API can answer with all of Dodo's
    fields, including those added after this code was written.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    _delivered: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_delivered(
        cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo
    ) -> Any:
        if isinstance(value, dict) and not (info.context or {}).get(NUL_FREE):
            where = _nul_path(value, "data")
            if where:
                raise ValueError(f"{where} must not contain NUL characters")
        model = handler(value)
        if isinstance(value, dict):
            model._delivered = dict(value)
        elif isinstance(model, DodoObject):
            model._delivered = model.model_dump(mode="json")
        return model

    @property
    def delivered(self) -> dict[str, Any]:
        return self._delivered


class CustomerRef(BaseModel):
    """Dodo's `CustomerLimitedDetails`, reduced to the id we store."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    customer_id: Id


class WithCustomer(DodoObject):
    """Objects that carry Dodo's `customer` object; we store its id."""

    customer: CustomerRef | None = None

    @property
    def customer_id(self) -> str | None:
        return self.customer.customer_id if self.customer else None


class PaymentData(WithCustomer):
    """`dodopayments.types.Payment`."""

    payment_id: Id
    status: Code | None = None
    total_amount: MinorUnits
    currency: Currency
    subscription_id: Id | None = None
    refund_status: Code | None = None
    created_at: Instant | None = None


class RefundData(WithCustomer):
    """`dodopayments.types.Refund`."""

    refund_id: Id
    payment_id: Id
    status: Code
    amount: MinorUnits | None = None
    currency: Currency | None = None
    created_at: Instant | None = None


class DisputeData(DodoObject):
    """`dodopayments.types.Dispute`; `amount` is a decimal string."""

    dispute_id: Id
    payment_id: Id
    dispute_status: Code
    dispute_stage: Code
    amount: Amount
    currency: Currency
    created_at: Instant | None = None


class SubscriptionData(WithCustomer):
    """`dodopayments.types.Subscription` (plus the event's `past_due_ends_at`, `payment_id`)."""

    subscription_id: Id
    status: Code
    product_id: Id
    quantity: Count
    next_billing_date: Instant | None = None
    previous_billing_date: Instant | None = None
    cancel_at_next_billing_date: StrictBool = False
    cancelled_at: Instant | None = None
    created_at: Instant | None = None


class LicenseKeyData(DodoObject):
    """`dodopayments.types.LicenseKey`."""

    id: Id
    key: Id
    status: Code
    customer_id: Id
    product_id: Id
    expires_at: Instant | None = None
    payment_id: Id | None = None
    subscription_id: Id | None = None
    created_at: Instant | None = None


class CreditLedgerEntryData(DodoObject):
    """`dodopayments.types.credit_entitlements.CreditLedgerEntry`; amounts are decimals."""

    id: Id
    amount: Amount
    balance_before: Amount
    balance_after: Amount
    overage_before: Amount
    overage_after: Amount
    created_at: Instant
    credit_entitlement_id: Id
    customer_id: Id
    is_credit: StrictBool
    # Dodo adds kinds (auto_top_up, refund, ...): any short code is accepted.
    transaction_type: Code
    business_id: Id | None = None
    brand_id: Id | None = None
    grant_id: Id | None = None
    reference_id: Id | None = None
    reference_type: Text | None = None
    description: Text | None = None


class CreditBalanceLowData(DodoObject):
    """`credit.balance_low`'s data: an alert on one (customer, entitlement) balance."""

    customer_id: Id
    credit_entitlement_id: Id
    subscription_id: Id
    available_balance: Amount
    threshold_amount: Amount
    threshold_percent: Count
    credit_entitlement_name: Text | None = None
    subscription_credits_amount: Amount | None = None
    brand_id: Id | None = None


class Envelope(BaseModel):
    """`{"business_id", "type", "timestamp", "data"}`; `timestamp` is when it occurred."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    business_id: Id
    timestamp: Instant


# Each event class's `type` is the Literal of its kind's types in shared/catalog.py, so a
# type is written once; mypy sees plain strings.
if TYPE_CHECKING:
    PaymentType: TypeAlias = str
    RefundType: TypeAlias = str
    DisputeType: TypeAlias = str
    SubscriptionType: TypeAlias = str
    LicenseKeyType: TypeAlias = str
    CreditLedgerType: TypeAlias = str
    CreditBalanceLowType: TypeAlias = str
else:
    PaymentType = Literal[types_of("payment")]
    RefundType = Literal[types_of("refund")]
    DisputeType = Literal[types_of("dispute")]
    SubscriptionType = Literal[types_of("subscription")]
    LicenseKeyType = Literal[types_of("license_key")]
    CreditLedgerType = Literal[types_of("credit_entry")]
    CreditBalanceLowType = Literal[types_of("credit_balance_low")]


class PaymentEvent(Envelope):
    type: PaymentType
    data: PaymentData


class RefundEvent(Envelope):
    type: RefundType
    data: RefundData


class DisputeEvent(Envelope):
    type: DisputeType
    data: DisputeData


class SubscriptionEvent(Envelope):
    type: SubscriptionType
    data: SubscriptionData


class LicenseKeyEvent(Envelope):
    type: LicenseKeyType
    data: LicenseKeyData


class CreditLedgerEvent(Envelope):
    type: CreditLedgerType
    data: CreditLedgerEntryData


class CreditBalanceLowEvent(Envelope):
    type: CreditBalanceLowType
    data: CreditBalanceLowData


DodoEvent = Annotated[
    Union[  # noqa: UP007 - a discriminated union reads best spelled out
        PaymentEvent,
        RefundEvent,
        DisputeEvent,
        SubscriptionEvent,
        LicenseKeyEvent,
        CreditLedgerEvent,
        CreditBalanceLowEvent,
    ],
    Field(discriminator="type"),
]

# kind (shared/catalog.py) -> its event model.
MODELS: dict[str, type[Envelope]] = {
    "payment": PaymentEvent,
    "refund": RefundEvent,
    "dispute": DisputeEvent,
    "subscription": SubscriptionEvent,
    "license_key": LicenseKeyEvent,
    "credit_entry": CreditLedgerEvent,
    "credit_balance_low": CreditBalanceLowEvent,
}

# event type -> its envelope model. A type missing here is stored and `ignored`.
SCHEMAS: dict[str, type[Envelope]] = {
    event_type: MODELS[kind] for event_type, kind in KIND_OF.items()
}


class EventValidationError(ValueError):
    """The payload of a handled type does not validate: the event is dead at once."""


def parse_event(event_type: str, body: bytes) -> Envelope | None:
    """The typed event, or None when no model is known for this type (it is ignored)."""
    model = SCHEMAS.get(event_type)
    if model is None:
        return None
    try:
        context = {NUL_FREE: True} if b"\\u0000" not in body else None
        event = model.model_validate_json(body, context=context)
    except ValidationError as exc:
        raise EventValidationError(describe_validation_error(exc)) from None
    return event
