// Package api is the issuer's HTTP API as its callers see it: the wire
// types of every request and answer, the roles a credential carries, and
// the Go client (Client) that the station's upload and the verifier
// terminal use. The server (blindperso/issuer/server) answers with the
// same types, so the two cannot drift; docs/openapi.yaml is the contract
// and a test holds it equal to these types and the server's routes.
//
// The package imports no token, store or smart-card code: a client links
// only the standard library and the protocol's constants.
package api

import (
	"encoding/json"
	"time"

	"blindperso/protocol"
)

// Roles a bearer token or a client certificate (its subject OU) carries.
const (
	RolePerso    = "perso"    // uploads batches, reads batch reports
	RoleVerifier = "verifier" // asks challenges, verifies cards' answers
	RoleAdmin    = "admin"    // reads and manages cards and batches, reads metrics
	RoleMetrics  = "metrics"  // reads /metrics only (a Prometheus scraper)
)

// Roles lists every role.
var Roles = []string{RolePerso, RoleVerifier, RoleAdmin, RoleMetrics}

// KnownRole reports whether r is one of Roles.
func KnownRole(r string) bool {
	for _, k := range Roles {
		if r == k {
			return true
		}
	}
	return false
}

// Results of a verification (VerifyResult.Result; also the issuer's auth
// log).
const (
	ResultOK      = "ok"      // the MAC verified; failed_auth is reset to 0
	ResultFailed  = "failed"  // the MAC did not verify (or the challenge was not one the issuer accepts); failed_auth + 1
	ResultBlocked = "blocked" // the MAC did not verify and this failure reached the limit: the card is now blocked
	ResultRefused = "refused" // the card was blocked or in conflict: refused without a token call
)

// Batch statuses (Batch.Status).
const (
	BatchImporting = "importing"
	BatchDone      = "done"
	BatchRefused   = "refused"
)

// Card states (Card.State).
const (
	StateActive   = "active"
	StateBlocked  = "blocked"
	StateConflict = "conflict"
)

// Batch is a batch's report: what the import of one station file did.
type Batch struct {
	ID         string          `json:"id"` // the batch file's SHA-256, hex
	Manifest   json.RawMessage `json:"manifest"`
	Records    int             `json:"records"`
	Imported   int             `json:"imported"`
	Duplicates int             `json:"duplicates"`
	Conflicts  int             `json:"conflicts"`
	Rejects    int             `json:"rejects"`
	// Unattested counts the batch's imported cards without a verified
	// chip attestation (PROTOCOL.md §10).
	Unattested int       `json:"unattested"`
	Status     string    `json:"status"`
	Reason     string    `json:"reason,omitempty"` // why a refused batch was refused
	Created    time.Time `json:"created"`
	Updated    time.Time `json:"updated"`
}

// BatchDetail is a batch's report with its rejects and conflicts (the
// answer to an upload and to GET /v1/batches/{id}).
type BatchDetail struct {
	Batch
	RejectList   []Reject   `json:"reject_list"`
	ConflictList []Conflict `json:"conflict_list"`
}

// Reject is a refused record: its line and why.
type Reject struct {
	Batch  string    `json:"batch"`
	Line   int       `json:"line"`
	Reason string    `json:"reason"`
	Time   time.Time `json:"time"`
}

// Conflict is a second c for a known card Id; the first is kept.
type Conflict struct {
	CardID  protocol.Hex `json:"card_id"`
	CSHA256 protocol.Hex `json:"c_sha256"`
	Batch   string       `json:"batch"`
	Line    int          `json:"line"`
	Time    time.Time    `json:"time"`
}

// Card is a card as the API shows it: everything the issuer stores of it
// but the wrapped key.
type Card struct {
	ID                protocol.Hex `json:"id"`
	Profile           string       `json:"profile"`
	IssuerFingerprint protocol.Hex `json:"issuer_fingerprint"`
	Blob              Blob         `json:"blob"`
	IssuerKeyLabel    string       `json:"issuer_key_label"`
	CSHA256           protocol.Hex `json:"c_sha256"`
	Batch             string       `json:"batch"`
	Line              int          `json:"line"`
	State             string       `json:"state"`
	FailedAuth        int          `json:"failed_auth"`
	StateReason       string       `json:"state_reason,omitempty"`
	// Attested: the chip attestation of the card's record verified at
	// import (PROTOCOL.md §10.4).
	Attested bool      `json:"attested"`
	Created  time.Time `json:"created"`
	Updated  time.Time `json:"updated"`
}

// Blob says how the card's K_I is wrapped at the issuer: the scheme, the
// token's mechanism code and the KEK's label (the wrapped bytes are not
// served).
type Blob struct {
	Scheme    string `json:"scheme"`
	Mechanism uint   `json:"mechanism"`
	KEK       string `json:"kek"`
}

// CardDetail is a card and its last auth log entries, newest first.
type CardDetail struct {
	Card Card        `json:"card"`
	Log  []AuthEntry `json:"log"`
}

// AuthEntry is one line of a card's auth log.
type AuthEntry struct {
	CardID protocol.Hex `json:"card_id"`
	Time   time.Time    `json:"time"`
	Result string       `json:"result"`
	Detail string       `json:"detail,omitempty"`
}

// Challenge is a fresh single-use challenge for a card.
type Challenge struct {
	Challenge protocol.Hex `json:"challenge"` // protocol.ChallengeLen bytes
	Expires   time.Time    `json:"expires"`
}

// VerifyRequest is a card's answer to a challenge.
type VerifyRequest struct {
	Challenge protocol.Hex `json:"challenge"`
	MAC       protocol.Hex `json:"mac"`
}

// VerifyResult is the issuer's verdict. Every failure that is about the
// challenge or the MAC (wrong MAC; unknown, used, expired or another
// card's challenge; unknown card) is the same ResultFailed; why is only
// in the server's log.
type VerifyResult struct {
	Result     string `json:"result"`
	FailedAuth int    `json:"failed_auth"`
}

// StateChange is the body of a block (reason required) or an unblock
// (optional body).
type StateChange struct {
	Reason string `json:"reason"`
}

// Health is the answer of /healthz.
type Health struct {
	Status string `json:"status"`
}
