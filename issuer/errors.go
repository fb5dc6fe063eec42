package issuer

import (
	"errors"
	"fmt"
	"net/http"

	"blindperso/api"
	"blindperso/hsm"
)

// Kind is what an error of this package means to whoever asked. It is the
// one classification of the issuer's errors: the API turns it into an
// HTTP status (API.fail) and cmd/issuer into an exit code.
type Kind int

const (
	// KindInternal: the store or the token failed; the details belong
	// in the log.
	KindInternal Kind = iota
	// KindNotFound: no such card or batch in this store.
	KindNotFound
	// KindConflict: the card's state does not allow the request.
	KindConflict
	// KindRefused: a batch refused as a whole.
	KindRefused
	// KindUnavailable: the token failed as a device (every member of a
	// group, if there are several: hsm.Unavailable); try again later.
	KindUnavailable
)

// ErrCardNotBlocked is returned by an unblock of a card that is not
// blocked.
var ErrCardNotBlocked = errors.New("card is not blocked")

// BatchRefusedError is a batch refused as a whole (its file does not
// match its manifest, or it is for another issuer key), with the reason
// the store recorded.
type BatchRefusedError struct {
	Path, Reason string
}

func (e *BatchRefusedError) Error() string {
	return fmt.Sprintf("batch %s refused: %s", e.Path, e.Reason)
}

// Batch statuses (BatchReport.Status, batches.status).
const (
	BatchImporting = api.BatchImporting
	BatchDone      = api.BatchDone
	BatchRefused   = api.BatchRefused
)

// classes are the sentinel errors with their kind and the short words an
// answer leads with.
var classes = []struct {
	err   error
	kind  Kind
	title string
}{
	{ErrNotFound, KindNotFound, "not found"},
	{ErrCardNotActive, KindConflict, "card is not active"},
	{ErrCardNotBlocked, KindConflict, "card is not blocked"},
}

// Classify returns err's kind and the words an answer leads with.
func Classify(err error) (Kind, string) {
	var br *BatchRefusedError
	if errors.As(err, &br) {
		return KindRefused, "batch refused"
	}
	for _, c := range classes {
		if errors.Is(err, c.err) {
			return c.kind, c.title
		}
	}
	if hsm.Unavailable(err) {
		return KindUnavailable, "token unavailable"
	}
	return KindInternal, "internal error"
}

// HTTPStatus is the kind's HTTP status.
func (k Kind) HTTPStatus() int {
	switch k {
	case KindNotFound:
		return http.StatusNotFound
	case KindConflict:
		return http.StatusConflict
	case KindRefused:
		return http.StatusUnprocessableEntity
	case KindUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}

// ExitCode is the kind's exit code for the issuer CLI (docs/ISSUER.md):
// 1 for anything else that failed.
func (k Kind) ExitCode() int {
	switch k {
	case KindNotFound:
		return 3
	case KindConflict:
		return 4
	case KindRefused:
		return 5
	case KindUnavailable:
		return 6
	}
	return 1
}
