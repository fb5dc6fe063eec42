package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"blindperso/hsm"
	"blindperso/issuer"
)

// memberHelp is the help of the commands that take several tokens.
const memberHelp = `--token may be given several times (or $` + envToken + ` may hold several
URIs separated by spaces or newlines) for tokens that hold the same issuer
key and KEK under the same labels: members of an HSM group without one
virtual slot, or SoftHSM2 tokens replicated by the key ceremony
(docs/OPERATIONS.md). At start the issuer proves they hold the same keys
without reading any secret (equal public-key fingerprints, then one
throwaway card imported on every member must give the same wrapped key)
and refuses a member that differs, naming it and why. Imports and
verifications then go to the healthy member with the least work in
flight; a member that fails as a device (CKR_DEVICE_ERROR,
CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, sessions that cannot be
reopened) or does not answer within --member-deadline is taken out, the
record or verification in flight is redone on another member, and the
member is re-probed every second until it answers with the group's keys.`

// issuerFlags adds --token (repeatable), --key, --kek and
// --member-deadline, and returns a function that opens every token, finds
// both keys in each and makes their hsm.Group. gated commands (import,
// serve) also audit each member's keys and refuse weak ones
// (weakKeyGate). Close what it returns with closeIssuer.
func issuerFlags(c *cobra.Command, gated bool) func(ctx context.Context, sessions int) (*issuer.Issuer, error) {
	uris := c.Flags().StringArray("token", nil, "PKCS#11 URI of the token; repeat for the members of a group (default $"+envToken+")")
	gate := func(context.Context, *issuer.Issuer) error { return nil }
	if gated {
		gate = weakKeyGate(c)
	}
	key := c.Flags().String("key", "", "label of the issuer key in the token (required)")
	kek := c.Flags().String("kek", "", "label of the KEK in the token (required)")
	deadline := c.Flags().Duration("member-deadline", hsm.DefaultDeadline, "with several --token: how long one token operation may take before its member is taken out and the work redone on another")
	c.MarkFlagRequired("key")
	c.MarkFlagRequired("kek")
	return func(ctx context.Context, sessions int) (is *issuer.Issuer, err error) {
		list := *uris
		if len(list) == 0 {
			list = strings.Fields(os.Getenv(envToken))
		}
		if len(list) == 0 {
			return nil, errors.New("no token: give --token URI or set " + envToken)
		}
		if *deadline <= 0 {
			return nil, fmt.Errorf("--member-deadline %v: must be positive", *deadline)
		}
		var members []hsm.Member
		defer func() {
			if err != nil {
				for _, m := range members {
					m.Token.Close()
				}
			}
		}()
		for i, u := range list {
			m, err := openMember(ctx, u, sessions, *key, *kek)
			if err != nil {
				if len(list) > 1 {
					return nil, fmt.Errorf("token %d of %d: %w", i+1, len(list), err)
				}
				return nil, err
			}
			members = append(members, m)
			if err := gate(ctx, &issuer.Issuer{Token: m.Token, Key: m.Key, KEK: m.KEK}); err != nil {
				return nil, err
			}
		}
		log := slog.New(slog.NewTextHandler(c.ErrOrStderr(), nil))
		g, err := hsm.NewGroup(ctx, members, hsm.GroupOptions{Deadline: *deadline, Log: log})
		if err != nil {
			return nil, err
		}
		if len(members) > 1 {
			log.Info("token group: every member holds the same issuer key and KEK", "members", len(members), "key", *key, "kek", *kek)
		}
		first := members[0]
		return &issuer.Issuer{Token: first.Token, Key: first.Key, KEK: first.KEK, Group: g}, nil
	}
}

// openMember opens one token and finds the issuer key and the KEK in it.
func openMember(ctx context.Context, uri string, sessions int, key, kek string) (hsm.Member, error) {
	tok, err := hsm.OpenURI(uri, sessions)
	if err != nil {
		return hsm.Member{}, err
	}
	k, err := tok.FindIssuerKey(ctx, key)
	if err != nil {
		tok.Close()
		return hsm.Member{}, err
	}
	w, err := tok.FindKEK(ctx, kek)
	if err != nil {
		tok.Close()
		return hsm.Member{}, err
	}
	return hsm.Member{Token: tok, Key: k, KEK: w}, nil
}

// closeIssuer stops the group's re-probing, destroys the session copies
// and closes every member's token. A member hung in a call (the reason it
// was taken out) would hold its Close forever, so the whole closing is
// given ten seconds; the process exits anyway after that.
func closeIssuer(is *issuer.Issuer) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		is.Close(ctx)
		if is.Group == nil {
			is.Token.Close()
			return
		}
		for _, m := range is.Group.Members() {
			m.Token.Close()
		}
	}()
	select {
	case <-done:
	case <-ctx.Done():
		slog.Warn("closing the tokens took too long (a member hung in a call?); exiting without")
	}
}
