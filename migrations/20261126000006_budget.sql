-- The monthly embedding budget and the spend against it, shared by every replica and kept
-- across restarts. Each API request reserves its estimated cost first (under a lock on the
-- budget row, so replicas cannot overshoot together), then settles to the billed tokens, or is
-- refunded if the request failed. A budget of 0 means none.
CREATE TABLE IF NOT EXISTS embed_worker.budget (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    monthly_usd numeric NOT NULL DEFAULT 0 CHECK (monthly_usd >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO embed_worker.budget DEFAULT VALUES ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS embed_worker.spend (
    month      date NOT NULL,
    model      text NOT NULL,
    tokens     bigint NOT NULL DEFAULT 0,
    usd        numeric NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (month, model)
);

CREATE OR REPLACE FUNCTION embed_worker.current_month() RETURNS date
LANGUAGE sql STABLE AS $$ SELECT (date_trunc('month', now() AT TIME ZONE 'UTC'))::date $$;

-- Reserves `usd` for `model` this month if it fits the budget. Returns (ok, spent after, budget).
CREATE OR REPLACE FUNCTION embed_worker.reserve_spend(p_model text, p_usd numeric)
RETURNS TABLE (ok boolean, spent numeric, budget numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = embed_worker, pg_temp AS $$
DECLARE
    b numeric;
    s numeric;
    m date := embed_worker.current_month();
BEGIN
    SELECT monthly_usd INTO b FROM embed_worker.budget FOR UPDATE;
    SELECT coalesce(sum(x.usd), 0) INTO s FROM embed_worker.spend x WHERE x.month = m;
    IF b > 0 AND s + p_usd > b THEN
        RETURN QUERY SELECT false, s, b;
        RETURN;
    END IF;
    INSERT INTO embed_worker.spend AS x (month, model, usd) VALUES (m, p_model, p_usd)
    ON CONFLICT (month, model) DO UPDATE SET usd = x.usd + EXCLUDED.usd, updated_at = now();
    RETURN QUERY SELECT true, s + p_usd, b;
END $$;

-- Settles a reservation made in `p_month`: the billed tokens, and the reserved amount corrected
-- to the billed cost (a failed request is settled with 0 tokens and 0 cost: a refund).
CREATE OR REPLACE FUNCTION embed_worker.settle_spend(p_month date, p_model text, p_reserved numeric,
                                                     p_usd numeric, p_tokens bigint)
RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = embed_worker, pg_temp AS $$
    UPDATE embed_worker.spend
       SET usd = usd - p_reserved + p_usd, tokens = tokens + p_tokens, updated_at = now()
     WHERE month = p_month AND model = p_model
$$;

GRANT SELECT ON embed_worker.budget, embed_worker.spend TO embed_worker;
GRANT EXECUTE ON FUNCTION embed_worker.reserve_spend(text, numeric),
                          embed_worker.settle_spend(date, text, numeric, numeric, bigint),
                          embed_worker.current_month() TO embed_worker;
